"""Files beyond Hugging Face checkpoint folders: GGUF (llama.cpp). Each format has a strict header reader that never
reads tensor data, and an analysis that returns data for its rules (`tieaudit/rules/gguf.py`)."""
