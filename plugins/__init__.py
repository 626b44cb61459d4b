"""Infergate's reference plugins, registered through the ``infergate.plugins`` entry points."""
