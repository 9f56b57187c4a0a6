"""Readers, validation, image loading and the upsert pipeline of the catalog."""
