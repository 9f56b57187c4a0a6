"""Stage 3: critics that score (room, query, product) pairs 0..1 with a rationale."""
