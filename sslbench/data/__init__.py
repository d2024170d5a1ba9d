"""Images in: sources (Hugging Face datasets, image folders, IDX, built-ins), decoding, the in-memory and lazy
datasets with their resumable loaders, batched transforms and the view pipelines objectives ask for. Imports only
``sslbench.core``.
"""
