"""File formats: dataset labels (DOTA, DIOR-R, VOC), DOTA Task1 results, Parquet artefacts, atomic writes."""
