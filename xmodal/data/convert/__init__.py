"""``xmodal data convert FORMAT SRC --out DIR``: real datasets into the shards the recipes read."""
