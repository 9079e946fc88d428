"""Layer 7 of pvq_cuda: applications. The ``pvq-cuda`` CLI and its jobs, model loading (the offline
default model, HF directories, GGUF files, PVQ directories), the corpus and its windows, perplexity
evaluation, result reports, and the codec demo. May import every layer below."""
