"""A model's files, read without torch: where its Hugging Face directory is (converting the embedded
GGUF default once), and its tokenizer and chat template. The engine and the tokenizer service both
use it, so the tokenizer service never imports the engine (the import layers in pyproject.toml)."""
