"""Adapters that let other frameworks use gkd's files (``gkd.integrations.mmseg``: an mmsegmentation backbone).

Nothing is imported here: each adapter needs its framework installed and is imported by name.
"""
