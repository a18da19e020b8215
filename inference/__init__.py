"""Inference over a trained model: what `demo.py` is a command line for.

Nothing is imported here (no import-time work); import the module you need:

- ``inference.errors``     ``InferenceError``: a user error, printed as one line (no traceback)
- ``inference.loading``    an HF folder or a pipeline checkpoint -> (model, tokenizer) with the prompt
                           format it was trained with; the context length
- ``inference.parallel``   ranks under the deepspeed launcher, the device, and ``deepspeed.init_inference``
                           (AutoTP, kernel injection with its fallback, the BLOOM attention-mask fix)
- ``inference.hf_chat`` ``ChatModel``: messages -> prompt token ids -> a ``Reply``
- ``inference.inputs``     prompts and training records -> ``Item`` (the messages the model sees)
- ``inference.chat``       one streamed reply, and the chat REPL (``ChatSession``, ``run_repl``)
- ``inference.batch``      a prompts file -> one JSON line per input

See docs/inference.md.
"""
