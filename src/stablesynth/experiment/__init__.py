"""The experiment layer: runs composed of the stages below (demo, real datasets), studies, results I/O.

Nothing below this layer imports it; ``bench`` and the CLI sit above it.
"""
