"""Several server processes on one port (``torchwire serve --workers N``).

The supervisor (``Supervisor``) starts, watches and stops the workers and loads no model; each
worker (``torchwire.fleet.worker``, run as its own process) is a whole ``torchwire.server.Server``.
"""

from torchwire.fleet.supervisor import Supervisor

__all__ = ["Supervisor"]
