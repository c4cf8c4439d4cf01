"""The language model: ``models`` (loading, LoRA, the termination token), ``forward`` (one
forward pass, log-probs), ``sampling`` (the KV-cached sampler and its scores),
``stochastic_beam`` (k distinct questions per prompt, without replacement), ``tokens`` (padding
and decoding) and ``embedding`` (sentence embeddings: diversity, meaning clusters)."""
