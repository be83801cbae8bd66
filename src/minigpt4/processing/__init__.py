"""Image transforms, caption processing and the prompt/label layout."""
