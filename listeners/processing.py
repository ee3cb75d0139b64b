"""The import path ``listeners/admin.py`` still uses for the replay service; new code imports from where the names live.

``ACK`` lives in :mod:`listeners.delivery`, ``dead_letter_replay`` in :mod:`listeners.replay`.
This module goes when admin.py imports them from there (admin.py is being changed on
another branch right now).
"""

from listeners.delivery import ACK
from listeners.replay import dead_letter_replay

__all__ = ["ACK", "dead_letter_replay"]
