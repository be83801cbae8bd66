"""Model parts: vision towers, the Q-Former, the LLM loader and MiniGPT-4 itself."""
