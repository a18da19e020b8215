"""Unified dataset package: JSON records -> validated -> templated -> tokenized -> fixed-shape tensors.

Nothing is imported here (no import-time work); import the modules you need:

- ``data.records``   load ``.json``/``.jsonl`` files and validate records (``load_records``)
- ``data.errors``    ``DataError`` (one line per bad record) and ``Problem``
- ``data.templates`` the prompt format of every record type (single source of truth),
                     ``CHAT_TEMPLATE``, ``rounds_to_messages``, ``set_chat_template``
- ``data.tokenize``  render + tokenize once with offsets -> input_ids and labels (-100 masked)
- ``data.packing``   truncate/drop over-long samples, pad or pack into ``max_seq_len`` rows
- ``data.dataset``   ``build_dataset`` (the one builder) and the torch Datasets it returns
- ``data.cache``     on-disk cache of built datasets, one builder per node (file lock)
- ``data.split``     eval split and DeepSpeed-Chat-like ``data_split`` shares
- ``data.sampler``   ``ResumableSampler``: seeded per-epoch shuffle for data parallel, exact resume
- ``data.inspect``   ``python -m data.inspect PATH...``: validate and show what is trained on

The record format is documented in ``docs/data_format.md``.
"""
