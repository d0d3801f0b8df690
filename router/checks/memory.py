"""Memory: writes to an agent's memory, its checkpoints and the shared context.

An agent acts on its own memory only; a CLI principal (an operator) may act on any
agent's. A ``knowledge`` write names its key and the other sections do not; only
knowledge can be ``core``. A checkpoint id is new for its agent, and its state blob
stays within the configured bound; a restore names a checkpoint of that agent. A checkpoint
of a given memory (``CheckpointSaved.memory``: a fork's) comes from an operator only.
"""

from __future__ import annotations

from ledgerbus.bus import codec
from ledgerbus.bus.events import CheckpointRestored, CheckpointSaved, MemoryWiped, MemoryWritten
from ledgerbus.router.checks import Check, Inbound, Rejection
from ledgerbus.router.state import RouterState


def make(max_state_bytes: int) -> Check:
    """The memory check, with checkpoint state blobs bounded to ``max_state_bytes``."""

    def check(msg: Inbound, state: RouterState) -> Rejection | None:
        event = msg.event
        if not isinstance(event, MemoryWritten | MemoryWiped | CheckpointSaved | CheckpointRestored):
            return None
        assert msg.principal is not None
        if msg.principal.kind == "agent" and msg.principal.name != event.agent:
            return Rejection(
                "not_memory_owner", f"{msg.principal_token} may act on its own memory only, not {event.agent}'s"
            )
        match event:
            case MemoryWritten(section="knowledge", key=None):
                return Rejection("bad_memory_write", "a knowledge write needs a key")
            case MemoryWritten(section=section, key=key) if section != "knowledge" and key is not None:
                return Rejection("bad_memory_write", f"a {section} write takes no key (got {key!r})")
            case MemoryWritten(section=section, core=True) if section != "knowledge":
                return Rejection("bad_memory_write", f"only knowledge can be core, not {section}")
            case CheckpointSaved(agent=agent, checkpoint_id=cid, state=blob, memory=image):
                if cid in state.checkpoints.get(agent, {}):
                    return Rejection("duplicate_checkpoint", f"{agent} already has a checkpoint {cid}")
                if image is not None and msg.principal.kind != "cli":
                    return Rejection("bad_checkpoint", "only an operator saves a checkpoint of a given memory"
                                     " (agentctl fork); an agent's checkpoint holds its memory as it is")
                size = len(codec.encode(blob))
                if size > max_state_bytes:
                    return Rejection(
                        "checkpoint_too_large", f"checkpoint state is {size} bytes; the limit is {max_state_bytes}"
                    )
            case CheckpointRestored(agent=agent, checkpoint_id=cid):
                if cid not in state.checkpoints.get(agent, {}):
                    known = ", ".join(sorted(state.checkpoints.get(agent, {}))[-5:]) or "none"
                    return Rejection("unknown_checkpoint", f"{agent} has no checkpoint {cid} (latest: {known})")
            case _:
                pass
        return None

    return check
