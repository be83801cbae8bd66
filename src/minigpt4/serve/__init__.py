"""Serving MiniGPT-4: the OpenAI-compatible HTTP API (`api`, run by `minigpt4 serve`) and the Gradio demo.

Nothing is imported here, so loading one server does not load the other's dependencies.
"""
