from runtime.server import main
from services.promotion.service import SPEC

main(SPEC)
