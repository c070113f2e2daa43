from runtime.server import main
from services.gifting.service import SPEC

main(SPEC)
