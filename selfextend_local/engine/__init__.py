"""The engine: a model, contexts and their sequences, the slot loop that decodes them, SelfExtend's position
schedules and division, planning, memory, and the disk cache of states. It imports nothing above it (no
tasks, no serving, no command line), and importing this package costs nothing: each module is imported
where it is used.

Floors, lowest first: ``errors``, ``settings``, ``build``, ``schedules``, ``registry``, ``metrics``;
``planning``, ``memory``, ``capacity``; ``llama_log``, ``model``, ``division``; ``context``; ``sequence``,
``state``, ``sampling``; ``slots`` (the one slot loop); ``session`` and ``generate`` (one request at a
time); ``kvcache``.
"""
