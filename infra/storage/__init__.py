"""Storage: paths and fsspec URIs (fsio), stage stores, Arrow tables, tar shards, record sinks, catalogs and readers."""
