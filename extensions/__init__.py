"""User extensions (one folder each) and the public extension API (`extensions.api`)."""
