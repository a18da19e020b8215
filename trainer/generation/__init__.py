"""Decoding on the training pipeline: pipelined KV-cached decoding, token sampling, eval samples."""
