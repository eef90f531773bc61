"""Runtime: sharding, running a stage over shards (skip, resume), Ray actor pools and Ray Train, Prefect glue."""
