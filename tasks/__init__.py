"""Stage functions: each turns one input shard into one output shard; no Prefect or Ray in here."""
