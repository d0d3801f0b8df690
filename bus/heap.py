"""The garbage collector's settings for the long-running processes (router, agents, projector).

CPython's cyclic collector runs its youngest generation every 700 net allocations. A router
allocates some hundreds of objects per message (a span, a record, the check pipeline's
copies, nats-py's message and its parsing), so the collector ran a few times per batch and
walked whatever had not yet been promoted; every so often it walked the whole heap,
including the modules and the state rebuilt at start-up, which only grows. Almost none of
it is cyclic garbage: reference counting frees it.

So, once a process has started: the heap as it is is moved out of the collector's sight
(``gc.freeze``: what start-up built is not garbage), and the youngest generation is
collected every :data:`GEN0_THRESHOLD` allocations instead of 700 (``LEDGERBUS_GC_GEN0``).
Measured with bench's router run (10,000 messages, same machine, alternating): 2,500 msg/s
with the defaults, 2,900 with these. The memory the collector may leave uncollected for
longer is that of cyclic garbage only, some tens of thousands of young objects at most.

The pauses are fewer and longer. Timed with ``gc.callbacks`` over 20,000 messages through
the router (its state growing by 20,000 tasks): with the defaults, 290 young collections
of up to 1 ms, 26 middle ones of up to 5 ms and two full ones of 115 ms, 310 ms in all;
with these, 4 young collections of 13-15 ms, 51 ms in all. A full collection still comes
as the state grows (by a quarter of what was not frozen), at about the same cost as with
the defaults, less often.
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 20_000
"""The default (``LEDGERBUS_GC_GEN0``): 700 gives CPython's own behaviour back."""


def settle(gen0: int = GEN0_THRESHOLD) -> None:
    """Collect once, freeze what survives, and collect the youngest generation every
    ``gen0`` allocations (see above). Call it when start-up is done; calling it again
    freezes what was built since."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0, gen1, gen2)
