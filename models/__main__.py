"""``python -m models``: every variant's parameter count (equal to the official models') and output grid."""
from models.variants import print_variants

print_variants()
