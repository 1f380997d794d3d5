"""Ties: what the model class declares (``declared``, cached across runs in ``cache``), joined with what the files
show into the tie graph (``graph``), measured with bounded memory (``compare``); the readers other than transformers
(``readers``, with vLLM's table in ``vllm_registry``)."""
