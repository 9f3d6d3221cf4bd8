"""The Gradio web UI (and later the REST API). No torch import anywhere in this package."""
