"""`python -m conversation_service`: serve ConversationService on CONVERSATION_SERVICE_ADDR's port."""

from common.server import main
from conversation_service.server import SERVICE_NAMES, lifespan

if __name__ == "__main__":
    main("conversation_service", SERVICE_NAMES, lambda settings: settings.conversation_service_addr, lifespan)
