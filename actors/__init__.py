"""The actor runtime (mailboxes, supervision, directory) and Parley's actors."""
