"""Planning: sample tables from an index, packers, cost model, schedule, pack plans, curriculum."""
