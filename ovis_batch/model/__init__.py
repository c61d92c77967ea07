"""The Ovis model runtime: Ovis2.5 implemented in the project, Ovis2 through transformers' native
classes, image preprocessing, prompts, thinking, generation and embeddings. Imports no Ray."""
