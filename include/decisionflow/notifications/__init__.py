"""Notifiers of the decisionflow provider (``BaseNotifier`` subclasses): see :mod:`.failure`."""
