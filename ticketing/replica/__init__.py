"""A second service's copy of tickets, kept from ticket events by the listener framework.

It stands for what another team's service would run: it knows tickets only through
the event contracts (``ticketing/events.py``), never through ``ticketing.models``.
"""
