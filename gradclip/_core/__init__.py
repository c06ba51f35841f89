"""The layer every other imports: ClipInfo, errors, validation, trees, the Ops protocol, the
clipper contract, the registry and the checkpoint format. Imports no other gradclip package."""
