"""Unified dataset package: JSON records -> validated -> templated -> tokenized -> fixed-shape tensors.

Nothing is imported here (no import-time work); import the modules you need:

- ``data.schema``    the unified record schema's names (``RECORD_TYPES``, ``ROLES``, ``FORMATS``) and ``json_type``,
                     shared by sources, formats and records
- ``data.sources``   data files -> raw records, streamed: ``.json``, ``.jsonl``, ``.parquet``, ``save_to_disk``
                     folders (``pyarrow``/``datasets`` imported only for those); ``{"path", "format"}`` paths
- ``data.formats``   the ecosystem's record formats (messages, ShareGPT, Alpaca, preference, completion,
                     question/answer), detected per file and mapped to the unified record types (read
                     as prompts for kind="prompt")
- ``data.records``   validate records (``validate_record``); ``RecordStream`` / ``load_records``
- ``data.errors``    ``DataError`` (one line per bad record) and ``Problem``
- ``data.templates`` the prompt format of every record type (single source of truth),
                     ``CHAT_TEMPLATE``, ``rounds_to_messages``, ``set_chat_template``
- ``data.chat_template``  ``template: "model"``: the tokenizer's own chat template, with assistant-only
                     masks (``{% generation %}`` blocks, or incremental rendering)
- ``data.tokenize``  render + tokenize once with offsets -> input_ids and labels (-100 masked);
                     the pad token (``choose_pad``, never EOS)
- ``data.packing``   right-truncate/drop over-long samples, pack into ``max_seq_len`` rows
- ``data.truncate``  left cut of pairwise/ranked/prompt context (answers keep their EOS), pretrain chunks
- ``data.dataset``   ``build_dataset`` (the one builder)
- ``data.batching``  the torch Datasets it returns (item shapes) and every collate (items -> micro-batch)
- ``data.cache``     on-disk cache of built datasets, one builder per node (file lock); the key
                     covers the data code (``data_code_version``)
- ``data.hashing``   ``file_sha256(path)``: the one file-hash helper
- ``data.split``     eval split and DeepSpeed-Chat-like ``data_split`` shares (``split_shares``,
                     ``share_of`` a list, ``load_share`` of record files)
- ``data.sampler``   ``ResumableSampler``: seeded per-epoch shuffle for data parallel, exact resume
- ``data.inspect``   ``python -m data.inspect PATH...``: validate and show what is trained on

The record format is documented in ``docs/data_format.md``.
"""
