"""`driftd demo`: the whole loop on real data (scikit-learn's digits) on the embedded default."""
