"""Run side: lean (numpy, tokenizers, jinja2, pillow); never imports torch or transformers."""
