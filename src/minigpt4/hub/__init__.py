"""The released MiniGPT-4 files by name: where they come from (`sources`), verified downloads (`http`),
and the cache with its manifest (`fetch`)."""
