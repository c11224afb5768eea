"""The data band: finding data sets (sources), reading them (readers), splitting them (splits),
the per-process cache (cache) and the on-device store with batched augmentation (store)."""
