"""The SQL catalog: products, the category tree, ingest jobs and rejected records,
and the category lock resolved against the taxonomy."""
