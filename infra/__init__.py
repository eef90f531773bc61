"""Infrastructure, by concern: ``config`` (typed run configuration), ``storage`` (paths, URIs, stores, tables), ``runtime`` (sharding, stage execution, Ray, Prefect)."""
