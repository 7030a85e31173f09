// Gradle build of the pocketformer demo app, for app teams (Android Studio / CI with the SDK).
// Not runnable on the pocketformer CI machine (no SDK, NDK or Gradle there): that machine
// builds the same sources with `pocketformer android-demo` (pocketformer/android.py).
pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}
dependencyResolutionManagement {
    repositoriesMode.set(RepositoriesMode.FAIL_ON_PROJECT_REPOS)
    repositories {
        google()
        mavenCentral()
    }
}
rootProject.name = "pocketformer-demo"
include(":app")
