from runtime.server import main
from services.payout.service import SPEC

main(SPEC)
