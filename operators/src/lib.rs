//! Built-in transforms.
