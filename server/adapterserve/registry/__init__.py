"""The adapter registry: validated adapter folders, their records and server-owned snapshots."""
