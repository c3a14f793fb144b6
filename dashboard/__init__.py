"""The student's dashboard, in one place.

- ``feed``: the coalesced machine feed (one batched push per interval, fed by the agent link);
  the lowest part, it imports no app.
- ``cards``: what a machine card and the session card say; every sentence is defined once and
  handed to ``static/js/dashboard.js`` through ``json_script``.
- ``views``: the dashboard page, its machines fragment (resync) and the history page.
- ``consumers``: the browser's live feed at ``/ws/dashboard/``.
"""
