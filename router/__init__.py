"""The router: the one enforcement point and the only writer of the audit log.

It fetches INGRESS in batches, runs the check pipeline on each message, appends one
hash-chained AUDIT record per message, waits for those acks, dispatches what was
accepted, and only then acks INGRESS.
"""
