"""``python -m models``: every variant's parameter count (equal to the official models') and output grid."""
from models.variants import print_variants

if __name__ == "__main__":
    print_variants()
