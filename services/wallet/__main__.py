from runtime.server import main
from services.wallet.service import SPEC

main(SPEC)
