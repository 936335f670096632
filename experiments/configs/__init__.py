"""ml-collections configs."""
