"""PV actors: each PV is owned by one actor, which alone speaks Channel Access for it.

This package imports nothing at its top: ``python -m pvhub.actors`` must reach its
parent-death check before any heavy import (see ``pvhub.actors.__main__``).
"""
